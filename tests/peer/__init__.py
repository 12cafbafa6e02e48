"""Peers the tests compare against that run native code (llama.cpp), called out of process."""
