"""The Doc2X trigger: wait for jobs in the triggerer."""
