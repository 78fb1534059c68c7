"""Build, verify, inspect, summarise and subset WebDataset shard sets."""
