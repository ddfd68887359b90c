"""Search: the query language, the engine (exact ITC, fusion, filters) and ITM reranking."""
