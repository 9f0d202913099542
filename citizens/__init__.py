"""What citizens see and do themselves: sign in, see and change who may be told what,
see who was told, act for someone as a proxy, and read the privacy notice."""
