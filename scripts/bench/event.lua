-- wrk script: one durable single-event POST per request, spread over 10,000 users.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Api-Key"] = os.getenv("SLUICE_KEY")
local n = 0
request = function()
  n = n + 1
  local body = string.format('{"userId":"user-%d","eventName":"page_view","dataFields":{"seq":%d,"path":"/p/%d"}}', n % 10000, n, n % 50)
  return wrk.format(nil, "/api/events/track", nil, body)
end
