"""Where the sequence helpers used to live: they are services/denoiser/gang/sequence.py's now (a family's own
sequence-parallel forward lives with the family, in services/families/). Kept so that imports
of the old location still work."""

from services.denoiser.gang.sequence import gather_sequence, local_slice

__all__ = ["gather_sequence", "local_slice"]
