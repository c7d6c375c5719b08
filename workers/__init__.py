"""Consumer entry points: the Huey instances that ``huey_consumer`` and ``indexq`` start."""
