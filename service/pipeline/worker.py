"""The main module of spawned worker processes: deliberately empty.

See ``workers.make_executor``: while workers spawn, the parent names this module as its
main, so that they do not import the CLI.
"""
