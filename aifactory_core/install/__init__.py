"""Installing the suite on an OpenNebula frontend.

``install.sh`` creates the Python environments and then drives :mod:`aifactory_core.install.main`:
:mod:`.layout` says where OpenNebula expects each kind of file, :mod:`.manifest` turns the source
tree into the list of what goes where, :mod:`.stage` applies that list as one journaled transaction
(dry run, rollback, uninstall from the recorded manifest), :mod:`.hookreg` registers the hook
templates with oned, :mod:`.hook_server` enables the optional resident hook server through
:mod:`.systemd`, and :mod:`.frontend_doctor` checks an installation. Only the standard library
is imported at module level, so the installer runs before the suite's dependencies exist.
"""
