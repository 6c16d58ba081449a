"""The per-VM transaction: journal, per-device ownership, execution with rollback, repair.

Plugins return :class:`~aifactory_core.model.Action` objects from ``aifactory_prepare``; this
package journals each before it is made, makes it, and undoes what was done in reverse when any
step fails. ``release`` undoes a prepared VM's journal; ``repair`` finishes or rolls back a
transaction a crash (kill -9, power loss) interrupted.
"""
