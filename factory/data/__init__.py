"""Inputs: what the factory reads from users (annotations of generated images, labeled photos,
prompts, image folders) and the toy world that stands in for them; every loader names each bad file."""
