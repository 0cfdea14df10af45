"""Test beds shared by the test suite and the benchmarks: DNS and SMTP peers, a Postfix request.

The benchmarks measure the code against the same peers the tests prove it
against, so both import them from here.  The import graph is one-way: the
product (``smtpdcheck``, ``policyd``) imports none of ``testbeds``,
``tests``, ``bench`` or ``tools``; ``bench`` imports ``testbeds`` but never
``tests``; ``testbeds`` imports only the product (tests/test_layering.py
checks it).  Not part of the installed packages.
"""
