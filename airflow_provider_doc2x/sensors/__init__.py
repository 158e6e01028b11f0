"""The Doc2X sensor: wait for a job submitted elsewhere."""
