"""The demo and its stand-ins (a small segmenter, the stand-in annotators): what `factory demo`,
the tests and the benchmarks use in place of people. No recipe imports this package."""
