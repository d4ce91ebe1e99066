"""MOVA (image + text to video with synchronised 48 kHz audio); see README.md."""
