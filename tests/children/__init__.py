"""Child programs the tests run in a fresh interpreter (``_support.child_argv(name, *args)``); none is a test.

Each module's docstring gives its command line and what it prints: the test that runs it parses exactly that.
"""
