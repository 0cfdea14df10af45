"""Development tools run from the source tree, not shipped: the manual page generator.

They read files only a checkout has (``debian/changelog``, ``etc/systemd``)
and write files that are committed (``man/``), so they live outside the
installed packages, which never import them (tests/test_layering.py).
"""
