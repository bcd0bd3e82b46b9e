-- wrk script: SendGrid Event Webhook posts, EVENTS events per request (default 10), every
-- event with its own sg_event_id, addresses spread over 10,000 users.
local events = tonumber(os.getenv("EVENTS") or "10")
local threads = 0
local counter = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

request = function()
  counter = counter + 1
  local parts = {}
  for i = 1, events do
    parts[i] = string.format(
      '{"email":"user%d@example.test","event":"%s","sg_event_id":"wrk-%d-%d-%d","timestamp":1700000000,"smtp-id":"<%d@sluice.test>","category":["newsletter"],"sg_message_id":"m%d"}',
      (counter * 7 + i + tid * 1000) % 10000, (i % 3 == 0) and "open" or "delivered", tid, counter, i, counter, counter)
  end
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, "[" .. table.concat(parts, ",") .. "]")
end
