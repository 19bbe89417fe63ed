-- wrk script: POST a small JSON event to the path given on the command line (/invoke).
wrk.method = "POST"
wrk.body = '{"name":"bench","n":42}'
wrk.headers["Content-Type"] = "application/json"
