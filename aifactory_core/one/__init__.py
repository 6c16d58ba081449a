"""The OpenNebula adapter: hardened XML in, typed request objects out, template syntax both ways.

Modules (one concern each; importing this package imports nothing else, lxml is imported only
when a document is actually parsed):

* :mod:`aifactory_core.one.xmlsafe` — the one hardened XML parser and the strict base64 decoder.
* :mod:`aifactory_core.one.template` — OpenNebula's template language: writer, reader,
  ``vm/monitor`` lines.
* :mod:`aifactory_core.one.vm` — ``<VM>`` → :class:`~aifactory_core.one.vm.VmRequest` and friends.
* :mod:`aifactory_core.one.payload` — the envelopes: ``$TEMPLATE``, ``$API`` (``CallInfo``),
  ``HOOK_MESSAGE``, ``VMM_DRIVER_ACTION_DATA``.
"""
