"""Streaming a user's journal to replicas on compute nodes (``sdeefs-replicad``).

Model
=====

A user's upper changes only through journaled records (``sdeefs.journal``).  A
*replica* is a copy of the user's layer root on a compute node that applies the
same records in the same order; after record N it holds the upper as it was
after record N on the login node.  Records stream as they are written, so when
a job starts its environment is already on the node.

Replicas pull: ``sdeefs-replicad`` on a compute node connects to an upstream (the
login node's daemon, which reads the journal, or another replica relaying what it
applied: a tree), says which user and from which seq, and receives RECORD frames;
it answers with ACKs of what it applied.  When the upstream no longer holds the
records a replica needs (trimmed, or a relay's buffer moved on), it sends a
*snapshot*: the whole upper as a sequence of ordinary records applied into a
staging directory, verified against a digest of the tree, then swapped in.  A
replica never has a silent gap.

The modules, by role
====================

``wire``      the frames, their authentication and every payload (HELLO, ACK and its
              subtree report, ERROR and its code, records): the one encoder and decoder
``snapshot``  a whole upper as SNAPSHOT frames, the tree digest, the staged copy
``origin``    the login end: each user's journal shipped to its followers, trimming
``replica``   the compute end: the replica on disk and the link that feeds it
``relay``     the tree: serving followers, placing joiners, relaying, barrier rounds
``daemon``    ``sdeefs-replicad``: the roles wired together, the control socket, main
``cli``       ``sdeefs replica ...`` and the replica rows of ``sdeefs status``

Only the shared core is imported here (``sdeefs.records``, ``journal``, ``layers``,
``apply``, ``writeahead``, ``trees``, ``statedir``, ``control``, ``offload``, ``sysio``);
what runs in worker threads and what on the trio loop: docs/threading.md.
"""
