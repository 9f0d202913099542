"""What citizens see and do themselves: signing in, and receipts for their consent choices."""
