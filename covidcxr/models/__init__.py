"""Model builders. Builders return uncompiled Keras models."""
