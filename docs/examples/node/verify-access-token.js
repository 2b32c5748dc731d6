// Verify an identity-worker access token in Node with `jose`: no broker round trip.
//   node verify-access-token.js <access token> [http://localhost:8080/.well-known/jwks.json]
// The JWKS is fetched once and cached; jose fetches it again when a token names a kid it
// does not hold (the worker rotated its keys), at most every 30 s. The algorithm is pinned
// to EdDSA: `alg: none` or an HS256 token "signed" with the public key is refused.
import { createRemoteJWKSet, errors, jwtVerify } from "jose";

const [token, jwksUrl = "http://localhost:8080/.well-known/jwks.json"] = process.argv.slice(2);
const jwks = createRemoteJWKSet(new URL(jwksUrl)); // create once per process, not per request

export async function verifyAccessToken(accessToken) {
  const { payload } = await jwtVerify(accessToken, jwks, {
    algorithms: ["EdDSA"],
    issuer: "identity-worker", // IDENTITY_ISSUER
    clockTolerance: 30, // seconds of clock skew
    requiredClaims: ["sub", "sid", "roles", "iat", "exp"],
  });
  return { accountId: payload.sub, sessionId: payload.sid, roles: payload.roles };
}

try {
  console.log(JSON.stringify(await verifyAccessToken(token ?? "")));
} catch (error) {
  // JWTExpired: refresh (session.refresh with the refresh token); anything else: not signed in.
  const why = error instanceof errors.JWTExpired ? "expired: refresh it" : "not valid";
  console.error(`${why} (${error.code ?? error.name})`);
  process.exitCode = 1;
}
