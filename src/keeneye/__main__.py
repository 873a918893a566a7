from keeneye.cli import app

app()
