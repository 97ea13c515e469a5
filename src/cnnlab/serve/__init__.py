"""`cnnlab serve`: a web page to draw or upload an image and watch the model classify it.

    from cnnlab.serve.app import create_app
    app = create_app("runs/demo", engine="numpy")   # a WSGI app; see app.py for the API

server.py runs it on waitress (timeouts, connection cap, thread pool, JSON errors);
cnnlab.inputs.drawing turns drawings and uploads into what the model was trained on.
"""
