"""What every task kind shares: the fingerprinted store, rejects, checks, grouping, labels, the fit
loop, the gate, tracking, packaging and lineage. Imports no kind package."""
