"""What a behaviour is: profiles and prompt sources (bundled data lives in abliterate/data)."""
