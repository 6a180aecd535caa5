"""What runs on a login node: the PAM session hook (pam) and the resident service (service)."""
