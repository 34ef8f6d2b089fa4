"""The offline loop: SFT, reward model and preference trainers on fixed data."""
