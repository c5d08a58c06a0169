"""Host configuration: the YAML reader (``yamlsafe``) and the factory that turns a loaded
config into the parts a task works with (backend, ledger, reporter, runner, records)."""
