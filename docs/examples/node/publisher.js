// Send `account.create` to the identity worker with amqplib and print the reply.
//   node publisher.js amqp://guest:guest@localhost:5672/ [WORKER_USER]
// Direct reply-to: consume `amq.rabbitmq.reply-to` (noAck) on the same channel BEFORE
// publishing; publish persistent JSON with replyTo, a correlationId, userId (your own broker
// user: the worker authorises by it) and an idempotency key; take a reply only if its userId
// is the worker's broker user.
import { randomUUID } from "node:crypto";
import amqp from "amqplib";

const REPLY_TO = "amq.rabbitmq.reply-to";
const url = process.argv[2] ?? "amqp://guest:guest@localhost:5672/";
const WORKER_USER = process.argv[3] ?? "guest";
const USER = decodeURIComponent(new URL(url).username) || "guest";

const connection = await amqp.connect(url);
const channel = await connection.createChannel();
const correlationId = randomUUID();

let gotReply;
const reply = new Promise((resolve) => {
  gotReply = resolve;
});
// Awaited, so the consumer exists before the publish: RabbitMQ refuses the publish otherwise.
await channel.consume(
  REPLY_TO,
  (message) => {
    const props = message?.properties;
    if (props?.correlationId === correlationId && props.userId === WORKER_USER) {
      gotReply(JSON.parse(message.content.toString("utf8")));
    }
  },
  { noAck: true },
);

const body = {
  idempotency_key: randomUUID(), // reuse it if you retry this very command
  payload: { email: "ada@example.com", password: "correct horse battery", display_name: "Ada" },
};
channel.publish("identity.commands", "account.create", Buffer.from(JSON.stringify(body)), {
  contentType: "application/json",
  persistent: true,
  replyTo: REPLY_TO,
  correlationId,
  messageId: randomUUID(),
  userId: USER, // RabbitMQ refuses any other value
  mandatory: true,
});

const timeout = new Promise((_, reject) => {
  setTimeout(() => reject(new Error("no reply within 10 s")), 10_000).unref();
});
try {
  console.log(JSON.stringify(await Promise.race([reply, timeout]), null, 2));
} finally {
  await connection.close();
}
