"""What a person sees and asks for beyond a run: the reporter, the HTML report, vm-doctor,
vm-list/vm-login (``inventory``), --rerun-failed, and vm-init (``adopt``). The Invoke tasks
themselves are ``vmtasks.tasks``, the one public import path."""
