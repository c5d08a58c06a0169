"""What outlives a run on the host: the ledger of leases (``ledger``), the rules for what a dead
run left (``sweep``, ``orphans``) and the run records (``records``)."""
