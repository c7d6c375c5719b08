"""What the consumers run: Huey task definitions, registered on a given Huey instance."""
