-- wrk script: the same bulk body on every request, read from the file BODY, sent with
-- Content-Encoding ENCODING when set (a gzip file, say). For comparing a compressed bulk
-- request with the same request uncompressed (scripts/bench-gzip).
local f = assert(io.open(os.getenv("BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Api-Key"] = os.getenv("SLUICE_KEY")
local encoding = os.getenv("ENCODING")
if encoding and encoding ~= "" then
  wrk.headers["Content-Encoding"] = encoding
end
