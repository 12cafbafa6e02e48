"""The training loop and its pieces: `config` (TrainConfig), `recipes`, `loop` (train), `loss`, `optim`,
`schedule`, `metrics`. Import the submodules directly; nothing heavy happens at package import."""
