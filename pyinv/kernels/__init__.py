"""Per-step ops: one file per op holding its plain-PyTorch ``<op>_reference`` (the source of
truth) and, where written, accelerated twins; :mod:`pyinv.ops` dispatches between them."""
