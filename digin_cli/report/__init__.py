"""Reports people look at: an HTML page for every run folder and bench folder (``pages``,
``bench_page``), the optimization plots next to each item's files (``plots``), and reading
run folders written before the record format (``legacy``)."""
