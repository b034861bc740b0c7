"""Training: the one loop and the methods that hand it a loss function."""
