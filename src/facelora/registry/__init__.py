"""One home per vocabulary: model families, score and metric names, the results layout."""
