// Print the identity worker's session events with amqplib.
//   node subscriber.js amqp://guest:guest@localhost:5672/ [WORKER_USER]
// Delivery is at least once: the same event can arrive twice, always with the same
// event_id, so drop repeats (here: a small in-memory window) and handle events idempotently.
// Only the worker's broker user publishes events: drop anything else as a forgery.
import amqp from "amqplib";

const url = process.argv[2] ?? "amqp://guest:guest@localhost:5672/";
const WORKER_USER = process.argv[3] ?? "guest";
const QUEUE = "guest.node.identity-events"; // your own durable queue, named after your user
const seen = new Set();

const connection = await amqp.connect(url);
const channel = await connection.createChannel();
await channel.prefetch(100);
await channel.checkExchange("identity.events"); // passive: the exchange is the worker's
await channel.assertQueue(QUEUE, { durable: true, arguments: { "x-queue-type": "quorum" } });
await channel.bindQueue(QUEUE, "identity.events", "session.*");

await channel.consume(QUEUE, (message) => {
  if (message === null) return; // the queue was deleted
  if (message.properties.userId !== WORKER_USER) {
    channel.ack(message); // not published by the worker: a forgery, dropped
    return;
  }
  let event;
  try {
    event = JSON.parse(message.content.toString("utf8"));
  } catch {
    channel.reject(message, false); // never parseable: don't requeue it forever
    return;
  }
  if (!seen.has(event.event_id)) {
    console.log(event.type, event.event_id, JSON.stringify(event.data));
    seen.add(event.event_id);
    if (seen.size > 10_000) seen.delete(seen.values().next().value);
  }
  channel.ack(message); // after handling: a crash before this line means redelivery
});
console.log(`waiting for events on ${QUEUE}; Ctrl-C to stop`);
