"""openboot's VM tasks: the vmtasks collection (see vmtasks/tasks.py and README.md)."""
from vmtasks.tasks import ns  # noqa: F401
