"""The main module of spawned worker processes: deliberately empty (see ``etl.make_executor``)."""
