"""Guest-safe code: what runs inside the VM, on its stock Python 3.9 with only Invoke.

Everything in this folder, and only this folder, goes to the guest in the tool bundle
(``vmtasks.lifecycle.vm.tool_bundle``). The rules, checked by tests/test_guest_python.py: Python
3.9 (vermin reads the folder), the standard library and Invoke only, and no import of a
``vmtasks`` module outside this folder (the one exception, the YAML reader that only a host
loading a ``.yaml`` config reaches, is named there). The host imports these modules too: the
config, the error family, the results model and the test identity are shared.
"""
