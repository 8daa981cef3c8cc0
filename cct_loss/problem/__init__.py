"""The problem description: who is a query, which keys there are, and which keys are each
query's positives and negatives, for every call shape."""
