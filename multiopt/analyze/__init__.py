"""Records -> what people read: DataFrames, markdown reports, plots, the regression gate.

Reads only records (and their files): never the instruments or the training code."""
