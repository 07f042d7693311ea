"""The benchmarks: ``quality`` runs every subcommand on the shapes world and judges the results
by ground truth (a module per row); ``perf`` measures what an optimization step costs."""
