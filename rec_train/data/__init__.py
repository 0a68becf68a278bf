"""Raw formats -> validated events -> vocabularies -> user sequences -> splits."""
