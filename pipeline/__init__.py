"""Offline stages: SSV2/UCF101 transcoding, annotation CSVs, manifests and synthetic datasets."""
