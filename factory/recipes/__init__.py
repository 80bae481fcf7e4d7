"""Recipes: each turns a config into an artifact (annotate, train, pretrain, generate, inspect), on
Ray where it scales out; the Ray-free work each runs is a plain function beside it."""
