"""onnxopt's passes, one module per pass (installed as ``onnxopt.passes``).

Every public module here registers its pass with :func:`onnxopt.registry.register_pass`; the
registry imports them all on first use, so adding a pass means adding one file.
"""
