"""Model folders: their files and records, model cards, parameter counts, and the Hub (`mot card`, `push`, `pull`)."""
