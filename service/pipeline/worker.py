"""The main module of spawned worker processes: deliberately empty (see ``workers.make_executor``)."""
