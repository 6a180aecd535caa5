"""What runs on a compute node: SLURM's prolog and epilog and ``sdeefs-run`` (job), and the
scan of root-only lower entries that job environments hide without a guard daemon (private)."""
